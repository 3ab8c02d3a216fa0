"""The fleet: the front door (Caddy) in front of the serving nodes, and the serving code's own releases.

`frontdoor` (the service), `routes` and `dns` (its routing table and how Caddy reads it, pure), `caddy`
(the process), `roll`, `canary` and `staging` (`modelcd release ...`), `cli`.
"""
