-- Run once by the postgres image on an empty data volume (/docker-entrypoint-initdb.d), as
-- POSTGRES_USER, who owns both. Optuna and MLflow each need a database of their own: both keep
-- an alembic_version table.
CREATE DATABASE optuna;
CREATE DATABASE mlflow;
