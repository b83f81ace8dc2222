"""Building blocks shared by the locate-then-edit methods (ROME, MEMIT, AlphaEdit, ...).

    templates   context templates x_j sampled from the model ("{}" first)
    keys        compose(template, prompt, subject), the last subject token from character
                offsets, keys k / outputs W k at it, averaged over templates (k*)
    target_opt  the target value v* = v₀ + δ at a site (ROME: mlp_out; MEMIT: resid) by one
                jitted while_loop over suffix-only steps
    linalg      float64 Cholesky solves with a relative ridge, the rank-one right vector,
                null-space projectors

Each method file reads like its paper's equations on top of these.
"""
