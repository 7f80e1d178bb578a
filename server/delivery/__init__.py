"""Membership changes leaving the server: the live feed, watch streams, and syncs to destinations."""
