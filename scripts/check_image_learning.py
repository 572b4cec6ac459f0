"""Does the training pipeline learn from images? Overfit 32 'exists' questions and compare the loss with
the right images against shuffled ones. Usage: python scripts/check_image_learning.py DATA_DIR
(DATA_DIR as written by `fastvlm data synth`, with a tokenizer in DATA_DIR/tokenizer)."""
import json
import sys

import torch
from fastvlm import FastVLM, FastVLMConfig
from fastvlm.train.data import ConversationDataset
from fastvlm.train.collate import DataCollator
from transformers import AutoTokenizer
if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
    sys.exit(__doc__)
DATA = sys.argv[1]
OV = DATA + "/overfit32.json"
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(DATA + "/tokenizer")
from fastvlm.config import VisionConfig, get_preset
text = dict(get_preset("fastvlm-tiny").text); text.update(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=704, vocab_size=768, tie_word_embeddings=True, max_window_layers=4)
vis = VisionConfig(image_size=128, depths=(1,1,2,1,1), embed_dims=(32,64,128,128,256), mlp_ratios=(3,)*5, head_dim=32, projection_dim=None, inference_mode=False)
m = FastVLM.from_config(FastVLMConfig(vision=vis, text=text), tokenizer=tok, device="cpu", dtype=torch.float32)
recs = [r for r in json.load(open(DATA + "/train.json")) if r["question_type"]=="exists" and len(r["conversations"])==2][:32]
json.dump(recs, open(OV,"w"))
ds = ConversationDataset(OV, DATA, tokenizer=tok, num_image_tokens=m.num_image_tokens, image_size=128)
batch = DataCollator(m.processor.pad_token_id)([ds[i] for i in range(len(ds))])
opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
m.train()
for step in range(150):
    out = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"], labels=batch["labels"])
    opt.zero_grad(); out.loss.backward(); opt.step()
    if step % 10 == 0:
        m.eval()
        with torch.no_grad():
            a = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"], labels=batch["labels"]).loss.item()
            b = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"][torch.randperm(32)], labels=batch["labels"]).loss.item()
        m.train()
        print(step, round(out.loss.item(),4), "eval", round(a,4), "shuffled", round(b,4), flush=True)
