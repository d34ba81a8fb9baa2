"""How actors and the learner reach each other: the protocols they are typed against
(`protocols`), an in-process implementation (`memory`) and the Redis one (`redis`). Imports
`common.core` only; no module outside `common.transport.redis` touches a Redis client."""
