"""GPT-2 pre-training in PyTorch: the reference backend of the common/loop.py trainer."""
