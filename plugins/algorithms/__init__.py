"""The built-in training algorithms, one module each, registered through ``register_algorithms`` like a
third party's: ``distill`` (logit-level KD, off- and on-policy), ``preference`` (the DPO family, SimPO)
and ``dpkd`` (Direct Preference Knowledge Distillation)."""
