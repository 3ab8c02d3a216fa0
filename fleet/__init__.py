"""The fleet: the front door (Caddy) in front of the serving nodes, and the serving binary's own releases."""
