"""Qwen-VL / Qwen-VL-Chat, implemented natively on the hub's remote-code checkpoints (docs/qwen_vl.md)."""
