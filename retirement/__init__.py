"""Model auto-retirement: last-use tracking, expiry warnings, retirement and package cleanup.

- `policy`: the sans-I/O decisions (warn / retire / skip / cancel), `now` passed in;
- `handlers`: what each message does to a model's entry, without Kafka;
- `service`: the faust-streaming worker (`run_retirement`, `RetirementProcessor`);
- `notify`: the pluggable `Notifier` (log line by default, webhook);
- `gc`: deleting retired packages from the store after a retention period;
- `cli`: `modelcd retirement`, `modelcd expiring`, `modelcd gc`.
"""
