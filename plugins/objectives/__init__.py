"""The built-in objectives, registered through ``register_objectives`` like a third party's: the
divergences (fkl, rkl, jsd, skl, srkl, tvd), the token objectives (ce, dpkd_token) and the sequence-level
ones (dpo, simpo, dpkd)."""
