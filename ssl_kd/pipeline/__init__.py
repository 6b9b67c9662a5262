"""The whole pipeline as one resumable command (``ssl-kd run``)."""
