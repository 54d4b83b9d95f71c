"""Search backends (Optuna, Ray Tune, ENAS) and the ENAS controller policy."""
