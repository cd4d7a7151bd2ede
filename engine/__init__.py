"""The machinery the Prefect tasks wrap, with no Prefect in it: the training loop and its
loss normalizer (`loop`), a stage's training and evaluation (`training`), ranks and their
launcher (`distributed`, `launcher`), labeling devices and the labeling loop (`devices`,
`labeling`), the audit and soup math, the planner, the run directory and its lock
(`rundir`, `runlock`), input checks, and the family registry and contract (`families`,
`contract`). Plain Python and PyTorch: a notebook or another orchestrator can call it.
"""
