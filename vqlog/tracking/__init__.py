"""The tracking wing (MLflow): the retrying client and URI checks (`client`), the study and trial
runs (`runs`), the experiment table (`table`) and the figures (`plots`)."""
