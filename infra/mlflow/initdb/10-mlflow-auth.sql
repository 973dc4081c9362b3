-- Run once by the postgres image on an empty data volume: the database of MLflow's auth app.
CREATE DATABASE mlflow_auth;
