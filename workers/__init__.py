"""Celery side of EVC: the app builder, worker process hooks and the beat schedule."""
