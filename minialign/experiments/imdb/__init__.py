"""The IMDb controlled-sentiment experiment of the DPO paper: the aclImdb reader (reader.py) and the
driver (run.py; python -m minialign.experiments.imdb).
"""
