"""Floor 5, evaluation and reports: one evaluation of a policy (minialign.evaluation.evaluate), best-of-N,
the main job's report.
"""
