"""``nexttools fit``: registered here once its core lands."""
