"""Exports of configured models to other serving systems (``clipserve export``)."""
