"""The study wing (Optuna): sweep specs (`spec`, with `space` for the searched dimensions), the
storage, its lock and opening a study (`storage`, with `outage` for riding out a database
restart), the worker that runs trials until the study has its target (`worker`, with `trial`
for one trial and `progress` for what it prints), and `pool` for several worker processes."""
