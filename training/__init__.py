"""Offline training, never imported by the serving runtime. It reads ../shared/data.

- train_router.py     `python -m training.train_router`: the router's complexity classifier
- router_data.py      labelled prompts, the held-out split and its fingerprint
- embedding_cache.py  prompt vectors cached on disk between training runs
"""
