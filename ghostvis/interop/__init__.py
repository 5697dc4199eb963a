"""Hugging Face interop (docs/interop.md).

hf_llm.py        Qwen2/Llama <-> GPT: `import_llm(hf_dir, out_dir)`, `export_llm(ckpt_dir, out_dir)`, name/config maps
hf_tokenizer.py  `HFTokenizer`: a tokenizer.json behind the GhostVis `Tokenizer` interface; transformers tokenizer files
hf_vision.py     SigLIP/CLIP vision folders -> timm state dicts (`timm_state_dict_from_hf`, `timm_spec_from_hf`)
"""
