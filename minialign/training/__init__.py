"""Floor 3, the training machinery every script calls by name: config (flags), runtime (devices, DDP and
every collective), loop (data order, LR schedule, optimizer, train_step), checkpoint, logger, HF export.
"""
