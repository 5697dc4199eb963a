"""Hugging Face interop (docs/interop.md).

common.py        `InteropError`, `SafetensorsFolder` (lazy tensor access): what every converter shares
hf_llm.py        Qwen2/Llama <-> GPT: `import_llm(hf_dir, out_dir)`, `export_llm(ckpt_dir, out_dir)`, name/config maps
hf_tokenizer.py  `HFTokenizer`: a tokenizer.json behind the GhostVis `Tokenizer` interface; transformers tokenizer files
hf_vision.py     SigLIP/CLIP vision folders -> timm state dicts (`read_encoder_weights`, `timm_spec_from_hf`)
"""
