"""data_prep: the dataset command-line tool (``python -m data_prep`` or ``arcee-data``); see ``cli.py``."""
