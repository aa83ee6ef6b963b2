"""Training: domain adaptation and SFT with LoRA/QLoRA, merge and evaluation. CLI: `python -m training`."""
