"""`taskedge fleet`: a fleet of boards learns together on Flower (`flwr`, the [fleet] extra), one
job per file:

    exchange.py   what a round moves, defined once: trained state by name + allocation hash
    aggregate.py  FedAvg by examples, coordinate-wise median, trimmed mean (numpy only)
    options.py    FleetOptions (the server's flags = the Flower run config), BoardConfig (node config)
    server.py     the ServerApp: rounds, rejection of bad states, commit + resume, global accuracy
    client.py     the ClientApp: `adapt` for the round's steps from the global state, on the board
    launch.py     the Flower app folder, the SuperLink connection, `flwr run`
    report.py     the per-round report of a committed server state (table, --json)
    cli.py        `taskedge fleet serve|report`
    faults.py     test-only fault injection (tests/faults/test_fleet.py)

Flower is imported only by server.py, client.py and exchange.py's record helpers.
"""
