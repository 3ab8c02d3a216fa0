"""Gradual rollouts: traffic policy operations, the rollout state machine, the canary analysis, the controller.

Modules (pure cores first):
    analysis.py     canary vs baseline figures from prediction logs (error rate, latency, divergence): a verdict
    machine.py      the rollout state machine: plans, steps, commands in, decisions out (`now` passed in)
    traffic_ops.py  reading an endpoint's view from the traffic topic; the checks behind `traffic set` and
                    the rollout commands, shared by the CLI and the API
    service.py      the controller (`run_controller`): reads prediction logs, ticks the machines, publishes
                    the policies it decides on the traffic topic
    api.py          the deployment API's `/endpoints` routes (mounted by whoever starts the API)
    cli.py          `modelcd traffic set|show`, `modelcd rollout start|status|pause|resume|abort|promote|controller`

A serving node needs none of this: it only follows the TrafficPolicy events this part publishes,
through its own router (modelcd.serving.router).
"""
