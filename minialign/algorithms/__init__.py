"""Floor 4, the algorithms' shared pieces: losses (pure functions), the packed training layout, sampling,
rollouts, advantages, rewards (rule functions, reward model, classifier) and the models a step holds.
"""
