"""Reproductions of published experiments, each one module run as `python -m minialign.experiments.NAME`.

    imdb      Rafailov et al. 2023 (DPO), Fig. 2 left: controlled sentiment generation on IMDb reviews, the
              reward-vs-KL frontier of DPO, PPO, PPO with the true reward, GRPO, best-of-N and Preferred-FT.
    frontier  the shared evaluation: true reward and sequence-level KL to the SFT model on held-out prompts.
"""
