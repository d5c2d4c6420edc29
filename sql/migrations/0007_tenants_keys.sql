-- Tenants as database roles, API keys, and row-level security.
--
-- A tenant may be given a PostgreSQL role (tenants.db_role). Connected as
-- that role (or after SET ROLE), a session sees and writes only its own
-- tenant's jobs and requests: row-level security enforces it in the server,
-- whatever the client does. The daemons connect as the schema's owner, which
-- row-level security does not restrict; they enforce tenants in C as well.
--
-- API keys for the HTTP lane are stored only as the hex SHA-256 of the key;
-- the key itself is shown once, by create_api_key. Revoking a key sends
-- NOTIFY spool_api_keys with the key's id so that schedulers drop it from
-- their caches at once.

ALTER TABLE spool.tenants ADD COLUMN db_role name UNIQUE;

-- The tenant whose database role is ROLE, or NULL (an owner, an
-- administrator, or a role that is no tenant's). SECURITY DEFINER so that any
-- role may ask without reading spool.tenants itself; the caller passes its
-- own current_user, since inside this function current_user is the owner.
CREATE FUNCTION spool.tenant_of(role name) RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, spool AS $$
    SELECT name FROM spool.tenants WHERE db_role = role
$$;

-- The calling session's tenant (for its current role), or NULL.
CREATE FUNCTION spool.session_tenant() RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT spool.tenant_of(current_user)
$$;

-- Makes ROLE the database role of TENANT (creating the tenant if needed) and
-- grants it what a tenant needs: reading and writing its own jobs and
-- requests, and calling the submission API. The role must exist.
CREATE FUNCTION spool.grant_tenant_role(tenant text, role name) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = role) THEN
        RAISE EXCEPTION 'role "%" does not exist', role
            USING HINT = 'CREATE ROLE it first';
    END IF;
    INSERT INTO spool.tenants (name) VALUES (tenant) ON CONFLICT (name) DO NOTHING;
    UPDATE spool.tenants SET db_role = role WHERE name = tenant;
    EXECUTE format('GRANT USAGE ON SCHEMA spool TO %I', role);
    EXECUTE format('GRANT SELECT ON spool.models, spool.model_aliases, spool.tenants TO %I', role);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON spool.jobs, spool.requests TO %I', role);
    EXECUTE format('GRANT SELECT ON spool.job_status TO %I', role);
    EXECUTE format('GRANT USAGE ON ALL SEQUENCES IN SCHEMA spool TO %I', role);
END
$$;

ALTER TABLE spool.jobs ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_own ON spool.jobs
    USING (tenant = spool.session_tenant())
    WITH CHECK (tenant = spool.session_tenant());

ALTER TABLE spool.requests ENABLE ROW LEVEL SECURITY;
-- The subquery reads spool.jobs under the caller's own policy.
CREATE POLICY tenant_own ON spool.requests
    USING (EXISTS (SELECT 1 FROM spool.jobs j WHERE j.id = job_id))
    WITH CHECK (EXISTS (SELECT 1 FROM spool.jobs j WHERE j.id = job_id));

-- job_status reads jobs with the caller's rights and policies, not its owner's.
ALTER VIEW spool.job_status SET (security_invoker = true);

CREATE TABLE spool.api_keys (
    id          bigserial PRIMARY KEY,
    tenant      text NOT NULL REFERENCES spool.tenants (name),
    name        text NOT NULL DEFAULT '',
    prefix      text NOT NULL,            -- the key's first 16 characters, for listings
    key_hash    text NOT NULL UNIQUE CHECK (key_hash ~ '^[0-9a-f]{64}$'),
    scopes      text[] NOT NULL DEFAULT '{inference,batch}'
                CHECK (scopes <@ ARRAY['inference', 'batch', 'admin']),
    rpm_limit   int CHECK (rpm_limit > 0),  -- requests per minute; NULL: unlimited
    tpm_limit   int CHECK (tpm_limit > 0),  -- tokens (in + out) per minute; NULL: unlimited
    created_at  timestamptz NOT NULL DEFAULT now(),
    created_by  text NOT NULL DEFAULT current_user,
    revoked_at  timestamptz,
    revoked_by  text
);

-- Creates a key for TENANT (created if new) and returns it: the only time
-- the key's text exists outside the client. 256 random bits from
-- gen_random_uuid (pg_strong_random), as "sk-spool-" and 64 hex digits.
CREATE FUNCTION spool.create_api_key(tenant text, name text DEFAULT '',
                                     scopes text[] DEFAULT '{inference,batch}',
                                     rpm_limit int DEFAULT NULL, tpm_limit int DEFAULT NULL)
    RETURNS TABLE (id bigint, key text)
LANGUAGE plpgsql AS $$
DECLARE
    k text := 'sk-spool-' || replace(gen_random_uuid()::text, '-', '')
                          || replace(gen_random_uuid()::text, '-', '');
    kid bigint;
BEGIN
    INSERT INTO spool.tenants (name) VALUES (tenant) ON CONFLICT ON CONSTRAINT tenants_pkey DO NOTHING;
    INSERT INTO spool.api_keys (tenant, name, prefix, key_hash, scopes, rpm_limit, tpm_limit)
    VALUES (tenant, name, left(k, 16), encode(sha256(convert_to(k, 'UTF8')), 'hex'), scopes,
            rpm_limit, tpm_limit)
    RETURNING api_keys.id INTO kid;
    RETURN QUERY SELECT kid, k;
END
$$;

-- Revokes a key; true when it was active. Schedulers hear of it at once.
CREATE FUNCTION spool.revoke_api_key(key_id bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE spool.api_keys SET revoked_at = now(), revoked_by = current_user
     WHERE id = key_id AND revoked_at IS NULL;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM pg_notify('spool_api_keys', key_id::text);
    RETURN true;
END
$$;
