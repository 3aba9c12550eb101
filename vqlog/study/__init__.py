"""The study wing (Optuna): sweep specs (`spec`), the storage, its lock and opening a study
(`storage`), and the worker that runs trials until the study has its target (`worker`, with
`trial` for one trial and `progress` for what it prints)."""
