"""Floor 2, the default task: its gold rule (minialign.task.gold) and the generator of data/
(python -m minialign.task.generate). Imports nothing else of minialign.
"""
