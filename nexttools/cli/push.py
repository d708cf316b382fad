"""``nexttools push``: registered here once its core lands."""
