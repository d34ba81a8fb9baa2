"""The Redis implementation of `common.transport.protocols`: trajectory streams (`streams`), the
signed weight store (`weights`), live telemetry (`telemetry`) and client helpers (`client`:
connect with retries, embedded servers, key expiry). The only modules that touch a Redis client."""
