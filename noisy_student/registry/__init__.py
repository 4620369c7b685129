"""MLflow: the runs every stage records, the logged and registered models, the one grammar
of model references, top-k predictions from any of them, and serving a model as an MLflow
pyfunc that follows an alias."""
