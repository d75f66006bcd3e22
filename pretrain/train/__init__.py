"""Training: the optimizer and schedule, the loss, sharding, checkpoints and the loop (`pretrain train`)."""
