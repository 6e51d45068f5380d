"""python -m minialign.experiments.imdb: see minialign.experiments.imdb.run."""

from minialign.experiments.imdb.run import main

main()
