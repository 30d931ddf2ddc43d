"""The range of seeds mft-bench accepts anywhere (recipe seed, benchmark and lm-eval seeds): numpy takes 32-bit
seeds, and every stage seeds numpy (``transformers.set_seed``)."""

SEED_MAX = 2**32 - 1
