-- The start-up check of the observer's Redis user: it runs no command and changes nothing.
-- Redis checks the caller's rights on every key an EVALSHA names before running the script, so calling it
-- with the keys the steps name answers NOPERM exactly when the user may not run them (deploy/redis/users.acl).
return 1
