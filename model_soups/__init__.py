"""Model soups: average the weights of fine-tunes of one pretrained model (Wortsman et al., ICML 2022).

The library does the work and knows nothing of Prefect; `tasks/` and `flows/` orchestrate it.
"""
