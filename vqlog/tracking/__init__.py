"""The tracking wing (MLflow): the retrying client and URI checks (`client`), the study run and
its study-level work (`runs`), one trial's run (`trial_run`), checkpoints, weights and the
registry (`artifacts`), lineage (`lineage`), the rows of the table (`rows`), the experiment
table (`table`) and the figures (`plots`)."""
