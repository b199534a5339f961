"""Helpers shared by several test areas: paths (`paths`), the one tiny model and job (`tiny`), runs
and checkpoints read back (`runs`), and model-level references (`models`). Fixtures live in the
conftest.py of the area that uses them (the root one when several do)."""
