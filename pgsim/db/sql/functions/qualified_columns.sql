-- 'OLD.a, OLD.b' for columns {a, b}.
CREATE OR REPLACE FUNCTION pgsim.qualified_columns(prefix text, columns name[]) RETURNS text
LANGUAGE sql IMMUTABLE
RETURN (
    SELECT string_agg(prefix || '.' || quote_ident(name), ', ' ORDER BY position)
    FROM unnest(columns) WITH ORDINALITY AS c(name, position)
);
