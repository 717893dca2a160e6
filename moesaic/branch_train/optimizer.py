"""The optimizer and learning-rate schedule of every training job (config section `train`).

AdamW (b1, b2, weight_decay; FlexOlmo uses 0.9, 0.95 and 0), linear warmup then cosine decay
to `lr * min_lr_ratio`, gradient clipping by global norm `clip`. The optimizer is built for
the trainable pytree only: frozen tensors never reach it, so it holds no state for them.
"""

from __future__ import annotations

import ml_collections
import optax


def schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
    """Warmup from 0 to `lr` over `warmup_steps`, then cosine to `lr * min_lr_ratio` at `steps`."""
    steps = int(train.steps)
    warmup = min(int(train.warmup_steps), max(steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=float(train.lr), warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1), end_value=float(train.lr) * float(train.min_lr_ratio))


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """clip_by_global_norm(clip) -> AdamW(schedule) for the trainable leaves."""
    parts = []
    if float(train.clip) > 0:
        parts.append(optax.clip_by_global_norm(float(train.clip)))
    parts.append(optax.adamw(schedule(train), b1=float(train.b1), b2=float(train.b2),
                             weight_decay=float(train.weight_decay)))
    return optax.chain(*parts)
