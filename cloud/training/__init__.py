"""Training on the cloud: the pool encoder, the teacher, and the student distilled from it.

encoder (self-supervised or supervised feature encoder, config in encoder_config) and classifier
(teacher training, distillation, checkpoints); trainers is the registry of round trainers that
turn a selection into a shipped model.
"""
