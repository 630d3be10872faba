"""Diffusion math of masked diffusion models (DESIGN §4): the forward process (masking), the losses and the
Monte Carlo ELBO. The masking part (top of this file) and the losses (below the marker) have different owners.
"""

# ---- losses ----
