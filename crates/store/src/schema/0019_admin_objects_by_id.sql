-- The STS finds a workload by its id alone (`caracal run` names no zone).
CREATE INDEX admin_objects_kind_id ON admin_objects (kind, id);
