"""Floor 6, experiments: the stage runner every driver uses (minialign.experiments.stages) and one folder
per reproduced paper, with its reader and judge.

    imdb      Rafailov et al. 2023 (DPO), Fig. 2 left: controlled sentiment generation on IMDb reviews
              (python -m minialign.experiments.imdb).
"""
