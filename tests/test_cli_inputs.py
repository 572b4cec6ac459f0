"""Bad command-line input is refused with a one-line message that names the problem, before any heavy work."""

import builtins
import os
import re
import shutil

import pytest

from fastvlm.cli import build_parser, main
from fastvlm.commands.common import bundled_model_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = os.path.join(ROOT, "examples", "shapes.png")
BUNDLED = bundled_model_path()
needs_bundled = pytest.mark.skipif(BUNDLED is None, reason="this install has no bundled model")


def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fastvlm {command}: error: "), err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def argparse_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def unusable_out_paths(tmp_path):
    """(path, words in the message): an existing regular file, and paths that cannot be created."""
    afile = tmp_path / "afile"
    afile.write_text("not a directory\n")
    cases = [(str(afile), "exists and is not a directory"), (str(afile / "sub"), "cannot create output directory")]
    if os.path.isdir("/proc/self"):  # Linux: nothing can be created in /proc
        cases.append(("/proc/fastvlm-test-out", "cannot create output directory"))
    return cases


# --- 1. an output path that is a file or cannot be created ----------------------------------


@needs_bundled
def test_convert_unusable_output_path_is_one_line_error(tmp_path, capsys, monkeypatch):
    def no_heavy_work(*a, **k):
        raise AssertionError("the source was read before the output path was checked")

    monkeypatch.setattr("fastvlm.checkpoints.resolve_path", no_heavy_work)
    for path, words in unusable_out_paths(tmp_path):
        assert main(["convert", BUNDLED, path, "--to", "hf"]) == 1
        err = one_line_error(capsys, "convert")
        assert path in err and words in err


def test_init_unusable_output_path_is_one_line_error(tmp_path, capsys, monkeypatch):
    def no_heavy_work(*a, **k):
        raise AssertionError("the model was built before the output path was checked")

    monkeypatch.setattr("fastvlm.commands.init.standin_tokenizer_for", no_heavy_work)
    for path, words in unusable_out_paths(tmp_path):
        assert main(["init", "--preset", "fastvlm-tiny", "--out", path]) == 1
        err = one_line_error(capsys, "init")
        assert path in err and words in err


# --- 2. sampling flags are checked when parsed, before the model loads ----------------------


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("flag, value, message", [
    ("--temperature", "-1", "temperature must be >= 0"),
    ("--temperature", "nan", "must be a finite number"),
    ("--top-p", "-0.5", "top_p must be in [0, 1]"),
    ("--top-p", "1.5", "top_p must be in [0, 1]"),
    ("--top-k", "-1", "top_k must be >= 0"),
    ("--repetition-penalty", "0", "repetition_penalty must be > 0"),
    ("--max-new-tokens", "0", "max_new_tokens must be at least 1"),
])
def test_bad_sampling_flag_is_refused_by_argparse(command, flag, value, message, capsys):
    err = argparse_error(capsys, [command, "-i", IMAGE, flag, value])
    assert f"fastvlm {command}: error: argument {flag}: {message}, got {value}" in err


def test_valid_sampling_flags_parse():
    args = build_parser().parse_args(["generate", "--temperature", "0.7", "--top-p", "1", "--top-k", "0",
                                      "--repetition-penalty", "1.1", "--max-new-tokens", "1"])
    assert (args.temperature, args.top_p, args.top_k, args.repetition_penalty, args.max_new_tokens) == \
        (0.7, 1.0, 0, 1.1, 1)
    assert build_parser().parse_args(["chat", "--temperature", "0"]).temperature == 0.0


# --- 3. info --resolution: 0 and negatives are refused like 100 ------------------------------


@pytest.mark.parametrize("resolution", ["0", "-64", "100"])
def test_info_refuses_non_positive_multiple_resolution(resolution, capsys):
    assert main(["info", "--preset", "fastvlm-tiny", "--resolution", "256", resolution]) == 1
    err = one_line_error(capsys, "info")
    assert f"resolution {resolution} is not a positive multiple of 64" in err
    assert capsys.readouterr().out == ""


# --- 4. convert into a non-empty directory needs --overwrite --------------------------------


def stale_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "generate_config.json").write_text("{}\n")  # a file of an older model
    (out / "config.json").write_text('{"model_type": "llava_qwen2"}\n')
    (out / "notes.txt").write_text("mine\n")
    (out / "sub").mkdir()
    return out


@needs_bundled
def test_convert_refuses_non_empty_output_without_overwrite(tmp_path, capsys):
    out = stale_output(tmp_path)
    assert main(["convert", BUNDLED, str(out), "--to", "fastvlm"]) == 1
    err = one_line_error(capsys, "convert")
    assert f"output directory {out} is not empty" in err and "--overwrite" in err
    assert sorted(os.listdir(out)) == ["config.json", "generate_config.json", "notes.txt", "sub"]


@needs_bundled
def test_convert_overwrite_replaces_only_model_files(tmp_path, capsys):
    from fastvlm.checkpoints import read_config

    out = stale_output(tmp_path)
    assert main(["convert", BUNDLED, str(out), "--to", "fastvlm", "--overwrite"]) == 0
    names = set(os.listdir(out))
    assert "generate_config.json" not in names
    assert {"notes.txt", "sub", "config.json", "model.safetensors"} <= names
    assert (out / "notes.txt").read_text() == "mine\n"
    assert read_config(str(out))[1] == "fastvlm"


@needs_bundled
def test_convert_overwrite_keeps_output_when_source_is_bad(tmp_path, capsys):
    out = stale_output(tmp_path)
    assert main(["convert", str(tmp_path / "no-such-model"), str(out), "--to", "hf", "--overwrite"]) == 1
    one_line_error(capsys, "convert")
    assert sorted(os.listdir(out)) == ["config.json", "generate_config.json", "notes.txt", "sub"]


@needs_bundled
def test_convert_in_place_still_works(tmp_path, capsys):
    from fastvlm.checkpoints import read_config

    here = tmp_path / "model"
    shutil.copytree(BUNDLED, here)
    assert main(["convert", str(here), str(here), "--to", "apple"]) == 0
    assert read_config(str(here))[1] == "apple"


def test_convert_help_documents_overwrite(capsys):
    with pytest.raises(SystemExit) as e:
        main(["convert", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--overwrite" in out and "leave any other files alone" in out


# --- 5. convert --dtype: no "auto" --------------------------------------------------------------


def test_convert_refuses_dtype_auto(tmp_path, capsys):
    err = argparse_error(capsys, ["convert", "src", str(tmp_path / "out"), "--to", "hf", "--dtype", "auto"])
    assert "argument --dtype: unknown dtype 'auto'; use one of fp32, bf16, fp16" in err
    assert "fp16, auto" not in err
    assert not (tmp_path / "out").exists()
    assert build_parser().parse_args(["convert", "a", "b", "--to", "hf", "--dtype", "BFloat16"]).dtype == "bf16"


# --- 6. chat: unknown /commands and a bare /image ------------------------------------------------


class FakeModel:
    last_timings = None

    def __init__(self):
        self.sent = []

    def chat(self, images, messages, stream=False, **kwargs):
        self.sent.append(messages[-1]["content"][-1]["text"])
        return iter(["ok"])


def run_chat(monkeypatch, lines):
    model = FakeModel()
    monkeypatch.setattr("fastvlm.commands.chat.load_model", lambda args: model)
    feed = iter(lines)

    def fake_input(prompt=""):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(builtins, "input", fake_input)
    assert main(["chat"]) == 0
    return model


def test_chat_refuses_unknown_command_and_explains_bare_image(monkeypatch, capsys):
    model = run_chat(monkeypatch, ["/unknown", "/imagefoo x", "/image", "/image   ", "//hello", "hi"])
    err = capsys.readouterr().err
    assert "unknown command /unknown; commands: /image PATH, /reset, /quit" in err
    assert "unknown command /imagefoo;" in err
    assert len(re.findall(r"^usage: /image PATH$", err, flags=re.M)) == 2
    assert "image file not found" not in err
    assert model.sent == ["/hello", "hi"]  # nothing of the refused commands reached the model


def test_chat_ctrl_c_stops_the_answer_or_clears_the_line_and_the_chat_goes_on(monkeypatch, capsys):
    closed, histories = [], []

    class Interrupted:
        last_timings = None

        def chat(self, images, messages, stream=False, **kwargs):
            histories.append([m["content"] if isinstance(m["content"], str) else m["content"][-1]["text"]
                              for m in messages])

            def gen():
                try:
                    yield "par"
                    yield "tial"
                    if len(histories) == 1:
                        raise KeyboardInterrupt  # Ctrl-C while the first answer streams
                    yield "!"
                finally:
                    closed.append(len(histories))
            return gen()

    monkeypatch.setattr("fastvlm.commands.chat.load_model", lambda args: Interrupted())
    feed = iter(["one", KeyboardInterrupt, "two"])

    def fake_input(prompt=""):
        item = next(feed, EOFError)
        if isinstance(item, type) and issubclass(item, BaseException):
            raise item
        return item

    monkeypatch.setattr(builtins, "input", fake_input)
    assert main(["chat"]) == 0  # neither Ctrl-C ended the session
    out = capsys.readouterr()
    assert "(stopped; the answer so far is kept)" in out.err and "(Ctrl-D or /quit leaves)" in out.err
    assert histories[1] == ["one", "partial", "two"]  # the stopped answer stayed in the conversation
    assert closed == [1, 2]  # each stream was closed: the interrupted one at once
    assert out.out.count("fastvlm> ") == 2


# --- 7. generate's default prompt is documented ---------------------------------------------------


def test_generate_help_states_default_prompt(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--prompt TEXT, -p TEXT the question or instruction (default: 'Describe the image.')" in out


def test_generate_without_a_prompt_on_the_bundled_model_says_what_it_can_answer(capsys):
    assert main(["generate", "--image", os.path.join(ROOT, "examples", "shapes.png"), "--no-timings"]) == 0
    err = capsys.readouterr().err
    assert "no --prompt given, so the question is 'Describe the image.'" in err and "How many shapes" in err


def test_readme_command_table_shows_prompt_optional():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    table = readme[readme.index("## Command line"):]
    table = table[:table.index("\n\n", table.index("| command |"))]
    row = next(line for line in table.splitlines() if line.startswith("| `fastvlm generate"))
    assert "[--prompt TEXT]" in row and "Describe the image." in row


def test_data_tokenizer_refuses_bad_sources_and_outputs(tmp_path, capsys):
    # each was a traceback, or a run that said it wrote a tokenizer it did not write / trained on nothing
    (tmp_path / "corpus.txt").write_text("hello world\nthe cat sat\n")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "obj.json").write_text('{"data": [{"a": 1}]}')
    (tmp_path / "bad.json").write_text("{bad")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "noconv.json").write_text('[{"bad": 1}]')
    shutil.copy(IMAGE, tmp_path / "binary.txt")
    cases = [
        ([str(tmp_path / "binary.txt"), "--out", str(tmp_path / "t")], "not UTF-8 text"),
        ([str(tmp_path / "corpus.txt"), "--out", str(tmp_path / "afile")], "exists and is not a directory"),
        ([str(tmp_path / "obj.json"), "--out", str(tmp_path / "t")], "expected a list of LLaVA records"),
        ([str(tmp_path / "bad.json"), "--out", str(tmp_path / "t")], "not valid JSON"),
        ([str(tmp_path / "empty.txt"), "--out", str(tmp_path / "t")], "no text to train a tokenizer on"),
        ([str(tmp_path / "noconv.json"), "--out", str(tmp_path / "t")], "no text to train a tokenizer on"),
    ]
    for args, message in cases:
        assert main(["data", "tokenizer", *args, "--vocab-size", "300"]) == 1
        assert message in one_line_error(capsys, "data tokenizer")  # named as argparse names the command
    assert (tmp_path / "afile").read_text() == "x" and not (tmp_path / "t").exists()
    assert main(["data", "tokenizer", str(tmp_path / "corpus.txt"), "--out", str(tmp_path / "ok"),
                 "--vocab-size", "300"]) == 0
    assert (tmp_path / "ok" / "tokenizer.json").is_file()
    first = (tmp_path / "ok" / "tokenizer.json").read_bytes()
    capsys.readouterr()
    again = ["data", "tokenizer", str(tmp_path / "obj.json"), "--out", str(tmp_path / "ok"), "--vocab-size", "300"]
    (tmp_path / "obj.json").write_text('[{"conversations": [{"from": "human", "value": "another corpus"}]}]')
    assert main(again) == 1  # a tokenizer already there is not replaced silently
    assert "is not empty (a tokenizer trained before?)" in one_line_error(capsys, "data tokenizer")
    assert (tmp_path / "ok" / "tokenizer.json").read_bytes() == first
    assert main([*again, "--overwrite"]) == 0 and (tmp_path / "ok" / "tokenizer.json").read_bytes() != first


@pytest.mark.parametrize("blocked,argv,extra", [
    ("uvicorn", ["serve"], "serve"),
    ("httpx", ["serve", "--allow-remote-images"], "serve"),
])
def test_missing_optional_package_names_the_extra(blocked, argv, extra, monkeypatch, capsys):
    # None in sys.modules makes `import blocked` raise ModuleNotFoundError, as on a plain `pip install fastvlm`
    import sys

    monkeypatch.setitem(sys.modules, blocked, None)
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"fastvlm serve: error: this needs the optional package '{blocked}', which is not installed: "
                   f"pip install 'fastvlm[{extra}]' (in a checkout: pip install -e \".[{extra}]\")"), err


def test_missing_package_hint_covers_every_optional_extra_and_nothing_else():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    from fastvlm.cli import missing_package_message
    from fastvlm.errors import OPTIONAL_PACKAGES

    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    def names(extra):
        return {re.split(r"[<>=\[ ]", req)[0].replace("-", "_") for req in extras[extra]}

    for package, extra in OPTIONAL_PACKAGES.items():
        assert package in names(extra), (package, extra)  # the extra named really installs the package
    for extra in ("serve", "bench", "train", "lmms"):  # and every package of a command's extra has its hint
        assert names(extra) - {"filelock"} <= set(OPTIONAL_PACKAGES), (extra, names(extra) - set(OPTIONAL_PACKAGES))
    assert missing_package_message("x", ModuleNotFoundError("no", name="yaml")) is None  # a real defect stays one


# --- a new user's walkthrough (session 21): each of these was a traceback, a silent overwrite or a late error ---


def _no_model_load(monkeypatch, where):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(where, refuse)


def test_serve_port_is_checked_before_the_model_loads(monkeypatch, capsys):
    import socket

    for port in ("99999", "-1", "0", "http"):
        assert "--port" in argparse_error(capsys, ["serve", "--port", port])
    _no_model_load(monkeypatch, "fastvlm.commands.common.load_model")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port), "--no-warmup"]) == 1
        err = one_line_error(capsys, "serve")
        assert f"cannot listen on 127.0.0.1:{port}" in err and "in use" in err, err
    finally:
        busy.close()


def test_init_refuses_a_non_empty_output_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "m"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"old shard")
    (out / "preprocessor_config.json").write_text("{}")
    assert main(["init", "--preset", "fastvlm-tiny", "--out", str(out)]) == 1
    assert "is not empty" in one_line_error(capsys, "init") and (out / "model-00001-of-00002.safetensors").exists()
    assert main(["init", "--preset", "fastvlm-tiny", "--out", str(out), "--overwrite"]) == 0
    names = set(os.listdir(out))
    assert "model-00001-of-00002.safetensors" not in names and "preprocessor_config.json" not in names
    assert {"notes.txt", "model.safetensors", "config.json"} <= names and (out / "notes.txt").read_text() == "mine"


def test_convert_in_place_leaves_no_file_of_the_old_layout(tmp_path, capsys):
    from fastvlm.model import FastVLM

    import torch

    m = tmp_path / "m"
    assert main(["init", "--preset", "fastvlm-tiny", "--out", str(m), "--dtype", "fp32"]) == 0
    (m / "vocab.json").write_text("{}")  # a tokenizer file the writers do not make: other tools may read it
    (m / "adapter.safetensors").write_bytes(b"not ours")  # nor a weight file of another name
    px = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    def outputs():  # the encoder is stored fused in the apple and hf layouts, so compare what it computes
        model = FastVLM.from_pretrained(str(m), image_size=64).eval()
        with torch.no_grad():  # (the hf layout pads the vocabulary: compare the logits of the original one)
            return model.get_image_features(px), model.language_model(torch.arange(1, 9)[None]).logits

    before = outputs()
    capsys.readouterr()
    for layout, gone in (("apple", set()), ("hf", {"generation_config.json"}),
                         ("fastvlm", {"generation_config.json", "preprocessor_config.json"})):
        assert main(["convert", str(m), str(m), "--to", layout]) == 0
        err = capsys.readouterr().err
        names = set(os.listdir(m))
        assert not names & gone, (layout, names)
        assert {"vocab.json", "adapter.safetensors"} <= names and not any(n.startswith(".convert-") for n in names)
        if layout == "hf":  # the Apple layout's (zero) MobileCLIP head has no place in transformers' layout
            assert "note: the hf layout has no place for Apple's MobileCLIP head" in err, err
        if layout == "fastvlm":
            assert "removed the previous layout's preprocessor_config.json" in err, err
    after = outputs()
    torch.testing.assert_close(after[0], before[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(after[1][..., :before[1].shape[-1]], before[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size", ["0", "0MB", "-1GB", "nanGB"])
def test_zero_or_negative_shard_size_is_refused(size, tmp_path, capsys):
    assert main(["init", "--preset", "fastvlm-tiny", "--out", str(tmp_path / "m"), f"--max-shard-size={size}"]) == 1
    assert "must be at least one byte" in one_line_error(capsys, "init")
    assert not (tmp_path / "m").exists()


def test_generate_checks_placeholders_and_urls_before_the_model_loads(monkeypatch, capsys):
    _no_model_load(monkeypatch, "fastvlm.commands.generate.load_model")
    assert main(["generate", "--image", IMAGE, "--prompt", "<image> and <image>: what differs?"]) == 1
    assert "the prompt has 2 <image> placeholders but 1 --image was given" in one_line_error(capsys, "generate")
    assert main(["generate", "--image", "https://example.com/a.png"]) == 1
    assert "is a URL" in one_line_error(capsys, "generate")


def test_device_errors_name_the_device_asked_for():
    import torch

    from fastvlm.errors import ConfigError
    from fastvlm.model import resolve_device

    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        with pytest.raises(ConfigError, match=f"'cuda:{n + 4}' requested but PyTorch sees {n} CUDA GPU"):
            resolve_device(f"cuda:{n + 4}")
    else:
        with pytest.raises(ConfigError, match="'cuda:5' requested but PyTorch sees no CUDA GPU"):
            resolve_device("cuda:5")


def test_train_max_steps_and_data_folder(tmp_path, capsys):
    assert "must be at least 1" in argparse_error(capsys, ["train", "x.yaml", "--max-steps", "0"])
    from fastvlm.errors import FastVLMError
    from fastvlm.train.data import _Source

    with pytest.raises(FastVLMError, match="is a folder"):
        _Source(str(tmp_path), None)


def test_a_training_step_folder_given_as_a_model_says_what_it_is(tmp_path, capsys):
    step = tmp_path / "run" / "step_25"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text("{}")
    assert main(["info", "--model", str(step)]) == 1
    err = one_line_error(capsys, "info")
    assert "is a training checkpoint (a step folder); load its run's final/ folder" in err, err


@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "unbuffered"])
def test_output_to_a_closed_pipe_ends_quietly(unbuffered):
    """`fastvlm info | head -1`: a reader that goes away ends the command without a BrokenPipeError traceback."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout buffered, as usually
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "fastvlm.cli", "info"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # nobody reads: the first write fails with EPIPE
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141, err.decode()[-2000:]
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()[-2000:]


def test_a_broken_pipe_other_than_stdout_is_an_error(monkeypatch, capsys):
    """A worker's or a socket's broken pipe is reported, not taken for a reader of stdout that went away."""
    import fastvlm.commands.info as info

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe (a worker's)")

    monkeypatch.setattr(info, "run", broken)
    assert main(["info"]) == 1
    assert "fastvlm info: error: [Errno 32] Broken pipe (a worker's)" in capsys.readouterr().err


def test_our_warnings_print_as_one_line(monkeypatch):
    """What Python's showwarning prints goes through warnings.formatwarning, which the CLI sets."""
    import os
    import warnings

    import fastvlm
    from fastvlm.cli import _one_line_warnings

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # restored after the test
    _one_line_warnings("generate")
    inside = os.path.join(os.path.dirname(fastvlm.__file__), "checkpoints", "__init__.py")
    assert warnings.formatwarning("the tokenizer is odd", UserWarning, inside, 1) == \
        "fastvlm generate: warning: the tokenizer is odd\n"
    other = warnings.formatwarning("library deprecation", FutureWarning, "/elsewhere/lib.py", 7, "")
    assert other.startswith("/elsewhere/lib.py:7: FutureWarning: library deprecation")  # others keep Python's


def test_a_cpu_that_could_run_the_native_kernels_is_told_when_they_are_off(monkeypatch, capsys):
    from fastvlm import kernels

    monkeypatch.setattr(kernels, "_state", {"lib": None, "why": "no C compiler (gcc, cc or clang) on PATH"})
    assert main(["generate", "--image", os.path.join(ROOT, "examples", "shapes.png"), "--prompt", "How many?",
                 "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert "note: native decode kernels off (no C compiler (gcc, cc or clang) on PATH)" in capsys.readouterr().err
    # a CPU they do not support is not told about them
    monkeypatch.setattr(kernels, "_state", {"lib": None, "why": "needs Linux on an x86-64 CPU with AVX-512"})
    assert main(["generate", "--image", os.path.join(ROOT, "examples", "shapes.png"), "--prompt", "How many?",
                 "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert "native decode kernels" not in capsys.readouterr().err
