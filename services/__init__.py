"""genloop's control plane: it decides and orchestrates, training/, serving/ and monitoring/ compute.

The config that composes every package's settings (``config``, ``schedule``), the model registry
(``registry``, MLflow), the evaluation gate and its report (``gate``, ``evaluation_report``),
promotion and rollback with their audit log (``lifecycle``, ``audit``), training runs
(``training_run``), the retrain pipeline and its scheduler (``retrain``, ``scheduler``), the drift
check (``drift_check``), the Serve deployment and its alias watch (``serving_control``), the
control-plane metrics (``exporter``), the Ray connection (``cluster``), the CLI and its console
(``cli``, ``console``), the demo (``demo``) and the sweep of what a killed process left
(``leftovers``).
"""
