"""The rollout controller: a deployment change rolled out in waves, judged by evidence.

``policy`` checks a spec's ``rollout`` member; ``plan`` is the planner (pure: waves,
admissions, outcomes, gates, commands); the driver reads the rows and the devices'
evidence, runs the planner, commits its decisions and restores on abort.
"""
